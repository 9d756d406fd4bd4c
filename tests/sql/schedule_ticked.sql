-- Record :tick (and its task :task) as the latest tick of :schedule, unless a later
-- one is recorded already.
UPDATE beanflow_schedules
SET last_tick=:tick,
    last_task_id=:task::UUID
WHERE beanflow_schedules.name = :schedule
  AND (beanflow_schedules.last_tick IS NULL
       OR beanflow_schedules.last_tick < :tick);
