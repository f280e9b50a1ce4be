"""The Celery pipeline (its app is in `celery.py`); empty of imports so `diskpipe` stays light."""
