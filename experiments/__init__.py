"""evomerge.experiments"""
