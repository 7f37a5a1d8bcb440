# A WSGI app for gunicorn: hello world.
def app(environ, start_response):
    body = b"hello world\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
