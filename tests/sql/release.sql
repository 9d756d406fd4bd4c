-- Return every task :worker still holds to PENDING: on shutdown, after it lost its
-- connection, or after a batch it could not record. Tasks in :innocent get their attempt
-- back (they did not run, or their run left no trace). Tasks in :charged ran in a
-- transaction that died with the connection: like a dead worker's tasks, each is charged
-- a crash (a task that keeps breaking its connection, say by staying idle in its
-- transaction past the server's limit, cannot stall the queue). Notifies the channels of
-- the tasks returned to PENDING.
WITH released AS
  (UPDATE beanflow_tasks
   SET state=CASE
                 WHEN (EXISTS
                         (SELECT *
                          FROM beanflow_cancellations
                          WHERE beanflow_cancellations.task_id = beanflow_tasks.id)) THEN 'CANCELLED'
                 WHEN (beanflow_tasks.id = ANY (:charged::UUID[])
                       AND least(beanflow_tasks.crash_count, 2147483646) + CASE
                                                                               WHEN (beanflow_tasks.id = ANY (:charged::UUID[])) THEN :param_1
                                                                               ELSE :param_2
                                                                           END >= :max_crashes) THEN 'FAILED'
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
                               WHEN (beanflow_tasks.id = ANY (:charged::UUID[])
                                     AND least(beanflow_tasks.crash_count, 2147483646) + CASE
                                                                                             WHEN (beanflow_tasks.id = ANY (:charged::UUID[])) THEN :param_1
                                                                                             ELSE :param_2
                                                                                         END >= :max_crashes) THEN concat(:concat_3, least(beanflow_tasks.crash_count, 2147483646) + CASE
                                                                                                                                                                                         WHEN (beanflow_tasks.id = ANY (:charged::UUID[])) THEN :param_1
                                                                                                                                                                                         ELSE :param_2
                                                                                                                                                                                     END, :concat_4)
                               ELSE beanflow_tasks.error_message
                           END,
                           attempts=(beanflow_tasks.attempts - CASE
                                                                   WHEN (beanflow_tasks.id = ANY (:innocent::UUID[])) THEN :param_3
                                                                   ELSE :param_4
                                                               END),
                           crash_count=(least(beanflow_tasks.crash_count, 2147483646) + CASE
                                                                                            WHEN (beanflow_tasks.id = ANY (:charged::UUID[])) THEN :param_1
                                                                                            ELSE :param_2
                                                                                        END),
                           started_at=:param_5,
                           finished_at=CASE
                                           WHEN (EXISTS
                                                   (SELECT *
                                                    FROM beanflow_cancellations
                                                    WHERE beanflow_cancellations.task_id = beanflow_tasks.id)) THEN clock_timestamp()
                                           WHEN (beanflow_tasks.id = ANY (:charged::UUID[])
                                                 AND least(beanflow_tasks.crash_count, 2147483646) + CASE
                                                                                                         WHEN (beanflow_tasks.id = ANY (:charged::UUID[])) THEN :param_1
                                                                                                         ELSE :param_2
                                                                                                     END >= :max_crashes) THEN clock_timestamp()
                                       END,
                                       worker_id=:param_6::UUID
   WHERE beanflow_tasks.worker_id = :worker::UUID
     AND beanflow_tasks.state = 'PROCESSING' RETURNING beanflow_tasks.id,
                                                       beanflow_tasks.channel,
                                                       beanflow_tasks.state,
                                                       beanflow_tasks.error_message),
     released_events AS
  (INSERT INTO beanflow_events (task_id, TYPE, error_message) SELECT released.id AS task_id,
                                                                     CASE
                                                                         WHEN (released.state IN ('FAILED',
                                                                                                  'CANCELLED')) THEN released.state
                                                                         ELSE 'REQUEUED'
                                                                     END AS TYPE,
                                                                     CASE
                                                                         WHEN (released.state IN ('FAILED',
                                                                                                  'CANCELLED')) THEN released.error_message
                                                                         ELSE 'its worker stopped before finishing it'
                                                                     END AS error_message
   FROM released)
SELECT pg_notify(anon_1.channel, :pg_notify_2) AS pg_notify_1
FROM
  (SELECT DISTINCT released.channel AS channel
   FROM released
   WHERE released.state = 'PENDING') AS anon_1;
