"""Hostile input, fuzzed: any bytes, any JSON, any YAML to the event decoder (directly and
over HTTP), the rules loader and the config loader gets a 4xx or a clean error (EventError,
RulesInvalid, ConfigError at FILE:LINE:COLUMN): never a 500, an escaping exception, a hang
or memory that grows. Property-based with Hypothesis, plus the classic bombs by name."""
