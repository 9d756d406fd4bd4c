-- Record that the schedule :schedule exists, once; returns when it was first seen, by any
-- scheduler (its catch-up never reaches back past that moment).
INSERT INTO beanflow_schedules (name)
VALUES (:schedule) ON CONFLICT (name) DO
UPDATE
SET name = excluded.name RETURNING beanflow_schedules.first_seen;
