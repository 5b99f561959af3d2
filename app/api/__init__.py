"""HTTP routers, one module per API family; routes stay thin."""
