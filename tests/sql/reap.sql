-- Mark RUNNING workers silent for :timeout NO_HEARTBEAT and, in the same statement,
-- return their PROCESSING tasks to PENDING, each charged a crash (FAILED at
-- :max_crashes). Returns (workers, tasks, channels notified) counts.
--
-- Also the tasks of a worker already found dead and silent since: a claim it committed
-- just after it was found dead (its statement had begun before) leaves it tasks that
-- its next heartbeat would have given back, had it lived to send one.
WITH dead AS
  (UPDATE beanflow_workers
   SET state='NO_HEARTBEAT'
   WHERE beanflow_workers.state = 'RUNNING'
     AND beanflow_workers.last_heartbeat < now() - :timeout RETURNING beanflow_workers.id),
     lost AS
  (SELECT dead.id AS id
   FROM dead
   UNION ALL SELECT beanflow_workers.id AS id
   FROM beanflow_workers
   WHERE beanflow_workers.state = 'NO_HEARTBEAT'
     AND beanflow_workers.last_heartbeat < now() - :timeout),
     requeued AS
  (UPDATE beanflow_tasks
   SET state=CASE
                 WHEN (EXISTS
                         (SELECT *
                          FROM beanflow_cancellations
                          WHERE beanflow_cancellations.task_id = beanflow_tasks.id)) THEN 'CANCELLED'
                 WHEN (least(beanflow_tasks.crash_count, 2147483646) + 1 >= :max_crashes) THEN 'FAILED'
                 ELSE 'PENDING'
             END,
             error_message=CASE
                               WHEN (EXISTS
                                       (SELECT *
                                        FROM beanflow_cancellations
                                        WHERE beanflow_cancellations.task_id = beanflow_tasks.id)) THEN
                                      (SELECT concat(:concat_2, beanflow_cancellations.requested_by) AS concat_1
                                       FROM beanflow_cancellations
                                       WHERE beanflow_cancellations.task_id = beanflow_tasks.id)
                               WHEN (least(beanflow_tasks.crash_count, 2147483646) + 1 >= :max_crashes) THEN concat(:concat_3, least(beanflow_tasks.crash_count, 2147483646) + 1, :concat_4)
                               ELSE concat(:concat_5, lost.id, :concat_6)
                           END,
                           crash_count=(least(beanflow_tasks.crash_count, 2147483646) + 1),
                           finished_at=CASE
                                           WHEN (EXISTS
                                                   (SELECT *
                                                    FROM beanflow_cancellations
                                                    WHERE beanflow_cancellations.task_id = beanflow_tasks.id)) THEN clock_timestamp()
                                           WHEN (least(beanflow_tasks.crash_count, 2147483646) + 1 >= :max_crashes) THEN clock_timestamp()
                                       END,
                                       worker_id=:param_1::UUID
   FROM lost
   WHERE beanflow_tasks.worker_id = lost.id
     AND beanflow_tasks.state = 'PROCESSING' RETURNING beanflow_tasks.id,
                                                       beanflow_tasks.channel,
                                                       beanflow_tasks.state,
                                                       beanflow_tasks.error_message),
     requeued_events AS
  (INSERT INTO beanflow_events (task_id, TYPE, error_message) SELECT requeued.id AS task_id,
                                                                     CASE
                                                                         WHEN (requeued.state IN ('FAILED',
                                                                                                  'CANCELLED')) THEN requeued.state
                                                                         ELSE 'REQUEUED'
                                                                     END AS TYPE,
                                                                     CASE
                                                                         WHEN (requeued.state IN ('FAILED',
                                                                                                  'CANCELLED')) THEN requeued.error_message
                                                                         ELSE requeued.error_message
                                                                     END AS error_message
   FROM requeued)
SELECT
  (SELECT count(*) AS count_1
   FROM dead) AS workers,

  (SELECT count(*) AS count_2
   FROM requeued) AS tasks,

  (SELECT count(*) AS count_3
   FROM
     (SELECT pg_notify(anon_2.channel, :pg_notify_2) AS pg_notify_1
      FROM
        (SELECT DISTINCT requeued.channel AS channel
         FROM requeued
         WHERE requeued.state = 'PENDING') AS anon_2) AS anon_1) AS channels;
