-- The CTE that claims up to :size due PENDING tasks of :channel_N, from :floor_N on,
-- for :worker, returning them.
--
-- The row selection is a MATERIALIZED CTE so it runs exactly once: inlined into the
-- UPDATE, the planner may re-run a SKIP LOCKED subquery and claim more rows than asked.
WITH channel_0 AS MATERIALIZED
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
   FOR UPDATE SKIP LOCKED), channel_1 AS MATERIALIZED
  (SELECT beanflow_tasks.id AS id,
          beanflow_tasks.scheduled_at AS scheduled_at,
          beanflow_tasks.crash_count AS crash_count
   FROM beanflow_tasks
   WHERE beanflow_tasks.state = 'PENDING'
     AND beanflow_tasks.channel = :channel_1
     AND beanflow_tasks.scheduled_at <= now()
     AND beanflow_tasks.scheduled_at >= :floor_1
   ORDER BY beanflow_tasks.scheduled_at
   LIMIT 10
   FOR UPDATE SKIP LOCKED), channel_2 AS MATERIALIZED
  (SELECT beanflow_tasks.id AS id,
          beanflow_tasks.scheduled_at AS scheduled_at,
          beanflow_tasks.crash_count AS crash_count
   FROM beanflow_tasks
   WHERE beanflow_tasks.state = 'PENDING'
     AND beanflow_tasks.channel = :channel_2
     AND beanflow_tasks.scheduled_at <= now()
     AND beanflow_tasks.scheduled_at >= :floor_2
   ORDER BY beanflow_tasks.scheduled_at
   LIMIT 10
   FOR UPDATE SKIP LOCKED), candidates AS MATERIALIZED
  (SELECT each_channel.id AS id,
          each_channel.scheduled_at AS scheduled_at,
          each_channel.crash_count AS crash_count
   FROM
     (SELECT channel_0.id AS id,
             channel_0.scheduled_at AS scheduled_at,
             channel_0.crash_count AS crash_count
      FROM channel_0
      UNION ALL SELECT channel_1.id AS id,
                       channel_1.scheduled_at AS scheduled_at,
                       channel_1.crash_count AS crash_count
      FROM channel_1
      UNION ALL SELECT channel_2.id AS id,
                       channel_2.scheduled_at AS scheduled_at,
                       channel_2.crash_count AS crash_count
      FROM channel_2) AS each_channel
   ORDER BY each_channel.scheduled_at
   LIMIT 10), due AS
  (SELECT candidates.id AS id
   FROM candidates
   WHERE candidates.crash_count <= :crash_count_1
     OR candidates.id =
       (SELECT candidates.id
        FROM candidates
        WHERE candidates.crash_count > :crash_count_2
        ORDER BY candidates.scheduled_at
        LIMIT :param_1)),
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
                                              beanflow_tasks.workflow_run_id)
SELECT claimed.id,
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
FROM claimed
ORDER BY claimed.scheduled_at;
