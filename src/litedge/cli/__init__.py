"""litedge.cli"""
