"""The output scanner: rules, engine, decoders, validators."""
