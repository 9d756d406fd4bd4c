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
   FROM claimed)
SELECT completion.beanflow_completed,
       claimed.id,
       claimed.channel,
       claimed.module,
       claimed.name,
       claimed.kwargs,
       claimed.state,
       claimed.result,
       claimed.error_message,
       claimed.attempts,
       claimed.crash_count,
       claimed.scheduled_at,
       claimed.created_at,
       claimed.unique_key,
       claimed.started_at,
       claimed.finished_at,
       claimed.worker_id,
       claimed.parent_id,
       claimed.workflow_run_id
FROM
  (SELECT count(*) AS beanflow_completed,

     (SELECT count(pg_notify('beanflow_done', CAST(beanflow_waiters.task_id AS TEXT))) AS count_2
      FROM beanflow_waiters
      WHERE beanflow_waiters.task_id = ANY (:task_ids::UUID[])) AS anon_1
   FROM done) AS COMPLETION
LEFT OUTER JOIN claimed ON TRUE
ORDER BY claimed.scheduled_at;
