-- Insert one task of :task_channel/:task_module/:task_name per element of :arguments
-- (JSON texts), children of :parent_id (null for none). One array parameter for all rows:
-- the statement's size does not grow with them.
INSERT INTO beanflow_tasks (channel, MODULE, name, kwargs, parent_id)
SELECT :task_channel AS channel,
       :task_module AS MODULE,
       :task_name AS name,
       CAST(unnest(:arguments::TEXT[]) AS JSONB) AS kwargs,
       :parent_id::UUID AS parent_id;
