"""ssl_ad.data"""
