"""The Celery pipeline (see app.py); empty of imports so `diskpipe` stays light."""
