"""Storage: the only package that imports pymongo (with outbox.py).

- `mongo_connector`: the client, its deadlines, and "the database did not answer";
- `ids`: the ids a request writes;
- `updates`: pure builders of the queries, updates and pipelines the stores run;
- `inbox_store`: the users' notification arrays;
- `idempotency_store`: Idempotency-Key records.
"""
