"""The online API: Ray Serve deployments (app.py) over render's model and writers (api.py: pure)."""
