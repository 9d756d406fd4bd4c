-- Seconds until the earliest PENDING task of :channel_N is due (negative when due,
-- NULL when none). Rows locked by a claim in progress are skipped, not waited for.
SELECT EXTRACT(epoch
               FROM least(
                            (SELECT beanflow_tasks.scheduled_at
                             FROM beanflow_tasks
                             WHERE beanflow_tasks.state = 'PENDING'
                               AND beanflow_tasks.channel = :channel_0
                             ORDER BY beanflow_tasks.scheduled_at
                             LIMIT :param_1
                             FOR KEY SHARE SKIP LOCKED),
                            (SELECT beanflow_tasks.scheduled_at
                             FROM beanflow_tasks
                             WHERE beanflow_tasks.state = 'PENDING'
                               AND beanflow_tasks.channel = :channel_1
                             ORDER BY beanflow_tasks.scheduled_at
                             LIMIT :param_2
                             FOR KEY SHARE SKIP LOCKED),
                            (SELECT beanflow_tasks.scheduled_at
                             FROM beanflow_tasks
                             WHERE beanflow_tasks.state = 'PENDING'
                               AND beanflow_tasks.channel = :channel_2
                             ORDER BY beanflow_tasks.scheduled_at
                             LIMIT :param_3
                             FOR KEY SHARE SKIP LOCKED)) - clock_timestamp()) AS anon_1;
