"""The scoring job: see pipelines/__init__.py for what each module holds."""
