"""HTTP API surfaces, one blueprint each."""
