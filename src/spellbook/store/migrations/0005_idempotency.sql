-- Idempotency keys (the `Idempotency-Key` request header): a client that retries a submission it lost the
-- answer to gets the job it already paid for, not a second one. A key is one owner's: NULL (the local user)
-- counts as one owner, as in images_owner_pixels. `idempotency_request` is a hash of the request as sent, so
-- the same key with another request is refused instead of answered with the wrong job.
ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
ALTER TABLE jobs ADD COLUMN idempotency_request TEXT;
CREATE UNIQUE INDEX jobs_idempotency ON jobs(IFNULL(owner, 0), idempotency_key) WHERE idempotency_key IS NOT NULL;
