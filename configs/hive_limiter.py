from hive_ratelimit_plugin.proxy import proxy_handler_instance  # noqa: F401  (see proxy.yaml)
