"""The indexer: tasks, gradient capture, compressors, preconditioner, featurize, build, store.

Its modules read like the pipeline (task → hooks → compress → precondition → featurize → build
→ store → reader). Nothing is re-exported here, so importing one module (the store, for the
command line's ``list``) never loads torch; the curated public names are ``gradindex.__all__``.
"""
