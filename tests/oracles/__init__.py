"""Reference implementations the tests check the package against (oracles), kept out of the package."""
