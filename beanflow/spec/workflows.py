"""The ``workflows`` section of beanflow.yaml → ``Workflow`` definitions, every mistake located:
unknown steps and processors, cycles (named), references to steps that are not upstream,
kwargs that cannot fit the step's function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jsonschema

from ..deployment import Deployment
from ..processors.processor import Processor
from ..workflows import Condition, Ref, Step, Workflow, step_copy
from .load import Path_
from .policies import PolicyCompiler

# what a step's function may receive by parameter name (see beanflow.workflows)
INJECTED = ("input", "results", "item")
HANDLER_INJECTED = ("input", "error", "step", "run_id")
SCHEMA_KEYS = {"type", "properties", "required", "$ref", "items", "oneOf", "anyOf", "allOf"}
SHORTHAND_TYPES = ("string", "integer", "number", "boolean", "array", "object")


class WorkflowCompiler:
    def __init__(
        self,
        section: dict[str, Any],
        deployment: Deployment,
        policies: PolicyCompiler,
        timeout: Callable[[dict[str, Any], Path_], Any],
        problem: Callable[[Path_, str], None],
        bad: Any,
    ) -> None:
        self.section, self.deployment, self.policies = section, deployment, policies
        self.timeout, self.problem, self.bad = timeout, problem, bad

    def compile_all(self) -> dict[str, Workflow]:
        compiled = {}
        for name, spec in self.section.items():
            if isinstance(spec, dict) and isinstance(spec.get("steps"), dict):
                workflow = self.workflow(name, spec)
                if workflow is not None:
                    compiled[name] = workflow
        return compiled

    def workflow(self, name: str, spec: dict[str, Any]) -> Workflow | None:
        path: Path_ = ("workflows", name)
        written = {s: v for s, v in spec["steps"].items() if isinstance(v, dict)}
        order = self.order(path, written)
        if order is None:
            return None
        schema = self.input_schema(spec.get("input"), (*path, "input"))
        upstream: dict[str, set[str]] = {}
        steps: dict[str, Step] = {}
        for step_name in order:
            step_spec = written[step_name]
            after = tuple(step_spec.get("after", ()))
            upstream[step_name] = set(after).union(*(upstream[a] for a in after))
            step = self.step(
                (*path, "steps", step_name), name, step_name, step_spec, upstream[step_name]
            )
            if step is not None:
                steps[step_name] = step
                self.check_fit(step, (*path, "steps", step_name), schema)
        handler = None
        if "on_failure" in spec:
            handler = self.handler(name, spec["on_failure"], (*path, "on_failure"))
        result = spec.get("result", order[-1])
        if result not in written:
            self.problem((*path, "result"), self.unknown_step(result, written))
        if len(steps) < len(written) or (handler is None and "on_failure" in spec):
            return None
        return Workflow(name, steps, str(result), handler, schema)

    def order(self, path: Path_, steps: dict[str, dict[str, Any]]) -> list[str] | None:
        """The steps, each after its upstreams (declared order otherwise); None, with a
        problem, for an unknown step in ``after`` or a cycle."""
        fine = True
        for name, spec in steps.items():
            for other in spec.get("after", ()):
                if other not in steps:
                    self.problem((*path, "steps", name, "after"), self.unknown_step(other, steps))
                    fine = False
        if not fine:
            return None
        order: list[str] = []
        visiting: list[str] = []

        def visit(name: str) -> bool:
            if name in order:
                return True
            if name in visiting:
                cycle = " → ".join((*visiting[visiting.index(name) :], name))
                self.problem(
                    (*path, "steps", name, "after"),
                    f"steps wait for each other in a cycle: {cycle}",
                )
                return False
            visiting.append(name)
            done = all(visit(other) for other in steps[name].get("after", ()))
            visiting.pop()
            if done:
                order.append(name)
            return done

        return order if all(visit(name) for name in steps) else None

    @staticmethod
    def unknown_step(name: Any, steps: dict[str, Any]) -> str:
        return f"no step named {name!r}; steps: {', '.join(steps)}"

    def processor(self, name: Any, path: Path_) -> Processor | None:
        try:
            return self.deployment.resolve(None, str(name))
        except LookupError:
            known = ", ".join(sorted(self.deployment.processors)) or "none"
            self.problem(path, f"no processor named {name!r}; declared: {known}")
            return None

    def step(
        self,
        path: Path_,
        workflow: str,
        name: str,
        spec: dict[str, Any],
        upstream: set[str],
    ) -> Step | None:
        processor = self.processor(spec.get("processor"), (*path, "processor"))
        sources = upstream | {"input"}
        for_each = None
        if "for_each" in spec:
            for_each = self.ref(spec["for_each"], (*path, "for_each"), sources, name)
        condition = None
        if "if" in spec:
            condition = self.condition(spec["if"], (*path, "if"), sources, name)
        kwargs = None
        if isinstance(spec.get("kwargs"), dict):
            allowed = sources | ({"item"} if "for_each" in spec else set())
            kwargs = self.references(spec["kwargs"], (*path, "kwargs"), allowed, name)
        processor = self.overridden(processor, spec, path, f"{workflow}.{name}")
        if processor is None or self.bad in (for_each, condition, kwargs):
            return None
        return Step(name, processor, tuple(spec.get("after", ())), for_each, condition, kwargs)

    def overridden(
        self, processor: Processor | None, spec: dict[str, Any], path: Path_, label: str
    ) -> Processor | None:
        """The step's processor, registered again under its own name when the step overrides
        its retry policy or timeout."""
        overrides: dict[str, Any] = {}
        if "retry_policy" in spec:
            compiled = self.policies.policy(spec["retry_policy"], (*path, "retry_policy"))
            if compiled is None:
                return None
            overrides |= {"retry_policy": compiled[0], "retry_exceptions": compiled[1] or None}
        if "timeout" in spec:
            timeout = self.timeout(spec, (*path, "timeout"))
            if timeout is self.bad:
                return None
            overrides["timeout"] = timeout
        if processor is None or not overrides:
            return processor
        derived = step_copy(processor, f"{processor.name}@{label}", **overrides)
        registry = self.deployment.app.registry.processors
        registry[(derived.channel, derived.module, derived.name)] = derived
        return derived

    def ref(self, text: Any, path: Path_, allowed: set[str], step: str) -> Any:
        try:
            ref = Ref.parse(str(text))
        except ValueError as error:
            self.problem(path, str(error))
            return self.bad
        if ref.source not in allowed:
            why = (
                "the element of a fan-out (for_each)"
                if ref.source == "item"
                else f"upstream of {step!r} (list it in after)"
            )
            self.problem(path, f"{ref}: {ref.source!r} is not {why}")
            return self.bad
        return ref

    def condition(self, spec: Any, path: Path_, allowed: set[str], step: str) -> Any:
        if isinstance(spec, str):
            ref = self.ref(spec, path, allowed, step)
            return self.bad if ref is self.bad else Condition.truthy(ref)
        tests = []
        for text, expected in spec.items():
            ref = self.ref(text, (*path, text), allowed, step)
            if ref is self.bad:
                return self.bad
            tests.append((ref, expected))
        return Condition(tuple(tests))

    def references(self, value: Any, path: Path_, allowed: set[str], step: str) -> Any:
        """``value`` with ``$…`` strings turned into Refs (``$$`` into a literal ``$``)."""
        if isinstance(value, str) and value.startswith("$$"):
            return value[1:]
        if isinstance(value, str) and value.startswith("$"):
            return self.ref(value[1:], path, allowed, step)
        if isinstance(value, dict):
            parsed = {k: self.references(v, (*path, k), allowed, step) for k, v in value.items()}
            return self.bad if self.bad in parsed.values() else parsed
        if isinstance(value, list):
            items = [self.references(v, (*path, i), allowed, step) for i, v in enumerate(value)]
            return self.bad if self.bad in items else items
        return value

    def check_fit(self, step: Step, path: Path_, schema: dict[str, Any] | None) -> None:
        """Whether the kwargs the step will get can fit its function (when they are known:
        declared, or a first step's input fields, or only what is injected)."""
        wanted = step.parameters
        given = {"input"} | ({"results"} if step.after else set())
        given |= {"item"} if step.for_each else set()
        if step.kwargs is not None:
            keys = set(step.kwargs)
        elif not step.after and step.for_each is None:
            if schema is None or "properties" not in schema:
                return  # the input decides
            keys = set(schema["properties"])
        else:
            keys = set()
        keys |= {name for name in given if name in wanted}
        try:
            step.processor.check_kwargs(dict.fromkeys(keys))
        except ValueError as error:
            hint = ""
            if step.kwargs is None and not step.after and step.for_each is None:
                hint = " (a first step gets the run's input as kwargs; declare kwargs: to choose)"
            elif step.kwargs is None:
                hint = (
                    " (a step after others gets only input, results and item; declare kwargs: "
                    "with $input.… or $STEP.… references)"
                )
            where = (*path, "kwargs") if step.kwargs is not None else (*path, "processor")
            self.problem(where, f"{error}{hint}")

    def handler(self, workflow: str, spec: Any, path: Path_) -> Step | None:
        if isinstance(spec, str):
            spec = {"processor": spec}
        processor = self.processor(spec.get("processor"), (*path, "processor"))
        kwargs = None
        if isinstance(spec.get("kwargs"), dict):
            kwargs = self.references(spec["kwargs"], (*path, "kwargs"), {"input"}, "on_failure")
        processor = self.overridden(processor, spec, path, f"{workflow}.on_failure")
        if processor is None or kwargs is self.bad:
            return None
        step = Step("on_failure", processor, kwargs=kwargs)
        keys = set(kwargs or {}) | {n for n in HANDLER_INJECTED if n in step.parameters}
        try:
            processor.check_kwargs(dict.fromkeys(keys))
        except ValueError as error:
            self.problem(path, f"{error} (on_failure gets input, error, step and run_id)")
            return None
        return step

    def input_schema(self, spec: Any, path: Path_) -> dict[str, Any] | None:
        """The input's JSON Schema: as written, or built from ``{field: type}``."""
        if spec is None:
            return None
        if not SCHEMA_KEYS & set(spec):
            bad = [k for k, v in spec.items() if v not in SHORTHAND_TYPES]
            for key in bad:
                self.problem(
                    (*path, key), f"{spec[key]!r} is not one of {', '.join(SHORTHAND_TYPES)}"
                )
            if bad:
                return None
            spec = {
                "type": "object",
                "properties": {k: {"type": v} for k, v in spec.items()},
                "required": list(spec),
            }
        try:
            jsonschema.Draft202012Validator.check_schema(spec)
        except jsonschema.SchemaError as error:
            self.problem(path, f"not a JSON Schema: {error.message}")
            return None
        return spec
