"""Processors the benchmarks run in real worker processes (configured from BEANFLOW_*)."""

import beanflow as bq

app = bq.BeanQueue()


@app.processor(channel="bench")
def noop() -> None:
    """The cheapest task: measures the queue, not the work."""
