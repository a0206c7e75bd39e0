"""Operations, each written once: the API, the admin, the worker and every intake call these."""
