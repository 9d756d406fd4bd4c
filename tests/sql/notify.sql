-- ``SELECT pg_notify(:channel, '')``: wakes the workers LISTENing on ``channel`` when the
-- transaction commits (never for a rolled-back transaction or savepoint).
SELECT pg_notify(:channel, :pg_notify_2) AS pg_notify_1;
