"""moerun: a distributed Mixture-of-Experts inference runtime."""
__version__ = "0.1.0"
