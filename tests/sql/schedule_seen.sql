-- Record that the schedule :schedule exists, once; returns when it was first seen, by any
-- scheduler, and its latest tick enqueued (its catch-up never reaches back past either: a
-- tick's task may be gone by retention, its unique key with it).
INSERT INTO beanflow_schedules (name)
VALUES (:schedule) ON CONFLICT (name) DO
UPDATE
SET name = excluded.name RETURNING beanflow_schedules.first_seen,
                                   beanflow_schedules.last_tick;
