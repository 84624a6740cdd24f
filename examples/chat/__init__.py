"""A real-time chat built only from dsys blocks, aiohttp and the browser (issue 15)."""
