"""litedge.export"""
