"""evomerge.search"""
