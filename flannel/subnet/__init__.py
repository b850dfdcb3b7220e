"""Contracts and lease policy: models, config, key schema, SubnetManager, etcd registry."""
