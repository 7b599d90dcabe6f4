"""Test plumbing shared by the tests and the benchmarks: real server processes, a real S3
server (SeaweedFS), a store that injects faults, the bank workload's worker."""
