"""evomerge.merge"""
