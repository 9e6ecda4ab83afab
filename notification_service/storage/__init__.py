"""Storage: the only package that imports pymongo (with outbox.py).

- `mongo_connector`: the client, its deadlines, and "the database did not answer";
- `ids`: the ids a request writes;
- `updates`: pure builders of the queries, updates and pipelines the stores run;
- `inbox_store`: the users' notification arrays;
- `idempotency_store`: Idempotency-Key records;
- `digest_outbox`, `dead_letter_store`, `user_email_store`: the outbox's digests, failed
  emails and a user's records (Outbox.digests, .dead_letters, .user_emails).
"""
