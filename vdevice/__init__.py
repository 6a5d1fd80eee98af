"""The virtual hardware as data: device models, topology, window arithmetic. No I/O."""
