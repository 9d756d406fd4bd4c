-- Which of :channels have a PENDING task due now (a burst run's "anything left?").
SELECT DISTINCT beanflow_tasks.channel
FROM beanflow_tasks
WHERE beanflow_tasks.state = 'PENDING'
  AND beanflow_tasks.channel = ANY (:channels::VARCHAR[])
  AND beanflow_tasks.scheduled_at <= now();
