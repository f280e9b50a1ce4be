"""The import job without Celery: fetch a source (`sources`, `transfer`,
`addresses`), unpack it (`unpacking`), convert and store it (`pipeline`),
record each step in Glance's image states (`records`, `states`), and keep one
delivery at a time per image (`lease`). `diskpipe.tasks` runs these in Celery
workers; the command line runs them in process (the embedded mode).
"""
