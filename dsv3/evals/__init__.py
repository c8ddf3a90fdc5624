"""dsv3.evals"""
