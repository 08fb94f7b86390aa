"""evomerge.objectives"""
