-- Insert one task whose ``columns`` are bind parameters of their own names (the others
-- take their defaults); with ``notify``, ``RETURNING pg_notify(:notify_channel, '')``: one
-- round trip where a flush and a separate NOTIFY take two.
INSERT INTO beanflow_tasks (id, channel, MODULE, name, kwargs, state, attempts, crash_count)
VALUES (:id::UUID, :channel, :module, :name, :kwargs::JSONB, :state, :attempts, :crash_count);
