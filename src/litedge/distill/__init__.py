"""litedge.distill"""
