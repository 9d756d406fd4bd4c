-- Insert a task unless one with the same :task_unique_key exists (any state); returns its
-- id only when inserted, and then notifies its channel. Concurrent inserters of one key:
-- exactly one wins, by the partial unique index.
WITH inserted AS
  (INSERT INTO beanflow_tasks (id, channel, MODULE, name, kwargs, state, attempts, crash_count, scheduled_at, unique_key)
   VALUES (:task_id::UUID,
           :task_channel,
           :task_module,
           :task_name,
           :task_kwargs::JSONB,
           :state,
           :attempts,
           :crash_count,
           :task_scheduled_at,
           :task_unique_key) ON CONFLICT (unique_key)
   WHERE unique_key IS NOT NULL DO NOTHING RETURNING beanflow_tasks.id,
                                                     beanflow_tasks.channel)
SELECT inserted.id,
       pg_notify(inserted.channel, :pg_notify_2) AS pg_notify_1
FROM inserted;
