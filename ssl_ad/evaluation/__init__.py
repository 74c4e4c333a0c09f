"""ssl_ad.evaluation"""
