-- Mark the tasks :task_ids DONE with their :task_results (JSON texts, in the same
-- order), only those :worker still holds; returns how many it marked. Fewer than given
-- means some were taken away (re-queued after a missed heartbeat): the caller rolls back.
-- One statement for a whole batch, so its completions cost one round trip. The
-- ``completion_columns`` follow the count.
WITH done AS
  (UPDATE beanflow_tasks
   SET state='DONE',
       RESULT=CAST(finished.result AS JSONB),
              error_message=:param_1,
              finished_at=clock_timestamp()
   FROM
     (SELECT unnest(:task_ids::UUID[]) AS id,
             unnest(:task_results::TEXT[]) AS RESULT) AS finished
   WHERE beanflow_tasks.id = finished.id
     AND beanflow_tasks.worker_id = :worker::UUID RETURNING beanflow_tasks.id)
SELECT count(*) AS count_1,

  (SELECT count(pg_notify('beanflow_done', CAST(beanflow_waiters.task_id AS TEXT))) AS count_2
   FROM beanflow_waiters
   WHERE beanflow_waiters.task_id = ANY (:task_ids::UUID[])) AS anon_1
FROM done;
