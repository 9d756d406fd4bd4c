-- ``claim_up_to(size)`` and ``complete``, in one statement (one round trip where the
-- two take two): a row per claimed task, its columns and beanflow_completed (how many
-- of :task_ids it marked DONE) and the ``completion_columns``; one row of NULLs but for
-- those when it claimed none. The two touch different rows (this worker's PROCESSING
-- tasks, PENDING ones).
--
-- The claim is made first, the completion once it is made (``_done(after=claimed)``).
-- Every sub-statement sees the snapshot of the statement's start; a task another worker
-- claimed and committed since is still PENDING in it, and the claim, finding its row
-- updated, locks the newer version to recheck it, a lock it keeps to its commit even
-- though the recheck fails. That worker's completion of the task then waits for this
-- commit. Claiming before completing takes the claim's reading as close to the snapshot
-- as it can be: in a four-worker drain at batch 10, statements waiting on another
-- worker's transaction fell from about as many samples as running ones to an eighth.
--
-- The ``completion_columns`` are computed over the batch, once it is complete and
-- claimed (each is a subquery of the outer select, which PostgreSQL evaluates on its
-- first row): the rows they lock (a fan-out's tallies) are held for less of the
-- transaction, so that workers ending neighbouring elements wait less for each other.
-- Count the step tasks among ``task_ids`` (an array) out of their slots' tallies (the
-- tallies locked in key order), and lock, in id order, each run of which one ended a slot
-- (its tally at zero) or a step that has no tallies, and the runs ``failed`` (an array of
-- run ids) with them; the column: how many runs it locked. With ``up_to``, only when there
-- are at most that many tasks (else NULL: not counted). Plain tasks, and fan-out elements
-- that leave their slots open, cost an index probe of the steps.
WITH candidates AS MATERIALIZED
  (SELECT beanflow_tasks.id AS id,
          beanflow_tasks.scheduled_at AS scheduled_at,
          beanflow_tasks.crash_count AS crash_count
   FROM beanflow_tasks
   WHERE beanflow_tasks.state = 'PENDING'
     AND beanflow_tasks.channel = :channel_0
     AND beanflow_tasks.scheduled_at <= now()
     AND beanflow_tasks.scheduled_at >= :floor_0
   ORDER BY beanflow_tasks.scheduled_at
   LIMIT 10
   FOR UPDATE SKIP LOCKED), due AS
  (SELECT candidates.id AS id
   FROM candidates
   WHERE candidates.crash_count <= :crash_count_1
     OR candidates.id =
       (SELECT candidates.id
        FROM candidates
        WHERE candidates.crash_count > :crash_count_2
        ORDER BY candidates.scheduled_at
        LIMIT :param_2)),
                            claimed AS
  (UPDATE beanflow_tasks
   SET state='PROCESSING',
       attempts=(least(beanflow_tasks.attempts, 2147483646) + 1),
       started_at=clock_timestamp(),
       worker_id=:worker::UUID
   FROM due
   WHERE beanflow_tasks.id = due.id RETURNING beanflow_tasks.id,
                                              beanflow_tasks.channel,
                                              beanflow_tasks.module,
                                              beanflow_tasks.name,
                                              beanflow_tasks.kwargs,
                                              beanflow_tasks.state,
                                              beanflow_tasks.result,
                                              beanflow_tasks.error_message,
                                              beanflow_tasks.attempts,
                                              beanflow_tasks.crash_count,
                                              beanflow_tasks.scheduled_at,
                                              beanflow_tasks.created_at,
                                              beanflow_tasks.unique_key,
                                              beanflow_tasks.started_at,
                                              beanflow_tasks.finished_at,
                                              beanflow_tasks.worker_id,
                                              beanflow_tasks.parent_id,
                                              beanflow_tasks.workflow_run_id),
                            done AS
  (UPDATE beanflow_tasks
   SET state='DONE',
       RESULT=CAST(finished.result AS JSONB),
              error_message=:param_1,
              finished_at=clock_timestamp()
   FROM
     (SELECT unnest(:task_ids::UUID[]) AS id,
             unnest(:task_results::TEXT[]) AS RESULT) AS finished
   WHERE beanflow_tasks.id = finished.id
     AND beanflow_tasks.worker_id = :worker::UUID
     AND
       (SELECT count(*) AS count_1
        FROM claimed) IS NOT NULL RETURNING beanflow_tasks.id),
                            done_events AS
  (INSERT INTO beanflow_events (task_id, TYPE) SELECT done.id AS task_id,
                                                      'COMPLETE' AS TYPE
   FROM done),
                            claimed_events AS
  (INSERT INTO beanflow_events (task_id, TYPE) SELECT claimed.id AS task_id,
                                                      'CLAIMED' AS TYPE
   FROM claimed),
                            workflow_ended AS
  (SELECT beanflow_workflow_steps.run_id AS run_id,
          beanflow_workflow_steps.step AS step,
          mod(beanflow_workflow_steps.index, 64) AS slot,
          count(*) AS n
   FROM beanflow_workflow_steps
   WHERE beanflow_workflow_steps.task_id = ANY (:task_ids::UUID[])
     AND cardinality(:task_ids::UUID[]) <= 16
   GROUP BY beanflow_workflow_steps.run_id,
            beanflow_workflow_steps.step,
            mod(beanflow_workflow_steps.index, 64)),
                            workflow_tallies_locked AS
  (SELECT beanflow_workflow_tallies.run_id AS run_id,
          beanflow_workflow_tallies.step AS step,
          beanflow_workflow_tallies.slot AS slot
   FROM beanflow_workflow_tallies
   JOIN workflow_ended ON beanflow_workflow_tallies.run_id = workflow_ended.run_id
   AND beanflow_workflow_tallies.step = workflow_ended.step
   AND beanflow_workflow_tallies.slot = workflow_ended.slot
   ORDER BY beanflow_workflow_tallies.run_id,
            beanflow_workflow_tallies.step,
            beanflow_workflow_tallies.slot
   FOR UPDATE OF beanflow_workflow_tallies),
                            workflow_counted AS
  (UPDATE beanflow_workflow_tallies
   SET OPEN=(beanflow_workflow_tallies.open - workflow_ended.n)
   FROM workflow_ended
   WHERE beanflow_workflow_tallies.run_id = workflow_ended.run_id
     AND beanflow_workflow_tallies.step = workflow_ended.step
     AND beanflow_workflow_tallies.slot = workflow_ended.slot
     AND (beanflow_workflow_tallies.run_id,
          beanflow_workflow_tallies.step,
          beanflow_workflow_tallies.slot) IN
       (SELECT workflow_tallies_locked.run_id,
               workflow_tallies_locked.step,
               workflow_tallies_locked.slot
        FROM workflow_tallies_locked) RETURNING beanflow_workflow_tallies.run_id,
                                                beanflow_workflow_tallies.step,
                                                beanflow_workflow_tallies.slot,
                                                beanflow_workflow_tallies.open),
                            workflow_runs_locked AS
  (SELECT beanflow_workflow_runs.id AS id
   FROM beanflow_workflow_runs
   JOIN
     (SELECT DISTINCT workflow_ended.run_id AS run_id
      FROM workflow_ended
      LEFT OUTER JOIN workflow_counted ON workflow_counted.run_id = workflow_ended.run_id
      AND workflow_counted.step = workflow_ended.step
      AND workflow_counted.slot = workflow_ended.slot
      WHERE coalesce(workflow_counted.open, 0) <= 0) AS workflow_at_zero ON beanflow_workflow_runs.id = workflow_at_zero.run_id
   ORDER BY beanflow_workflow_runs.id
   FOR UPDATE OF beanflow_workflow_runs)
SELECT batch.beanflow_completed,
       CASE
           WHEN (cardinality(:task_ids::UUID[]) <= 16) THEN
                  (SELECT count(*) AS count_2
                   FROM workflow_runs_locked)
       END AS beanflow_computed_0,
       batch.id,
       batch.channel,
       batch.module,
       batch.name,
       batch.kwargs,
       batch.state,
       batch.result,
       batch.error_message,
       batch.attempts,
       batch.crash_count,
       batch.scheduled_at,
       batch.created_at,
       batch.unique_key,
       batch.started_at,
       batch.finished_at,
       batch.worker_id,
       batch.parent_id,
       batch.workflow_run_id
FROM
  (SELECT completion.beanflow_completed AS beanflow_completed,
          claimed.id AS id,
          claimed.channel AS channel,
          claimed.module AS MODULE,
          claimed.name AS name,
          claimed.kwargs AS kwargs,
          claimed.state AS state,
          claimed.result AS RESULT,
          claimed.error_message AS error_message,
          claimed.attempts AS attempts,
          claimed.crash_count AS crash_count,
          claimed.scheduled_at AS scheduled_at,
          claimed.created_at AS created_at,
          claimed.unique_key AS unique_key,
          claimed.started_at AS started_at,
          claimed.finished_at AS finished_at,
          claimed.worker_id AS worker_id,
          claimed.parent_id AS parent_id,
          claimed.workflow_run_id AS workflow_run_id
   FROM
     (SELECT count(*) AS beanflow_completed
      FROM done) AS COMPLETION
   LEFT OUTER JOIN claimed ON TRUE
   ORDER BY claimed.scheduled_at) AS batch
ORDER BY batch.scheduled_at;
