"""The server's machinery: request validation (``protocol``, errors in ``errors``), tool
calling (``tools``), the Responses API (``responses``), the prompt-cache store
(``prompt_cache``), the batch scheduler (``scheduler``) and tiny test models (``tiny``).
The HTTP app and the command line are in :mod:`mlx_dgemma.server`."""
