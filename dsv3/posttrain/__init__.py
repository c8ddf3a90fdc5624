"""dsv3.posttrain"""
