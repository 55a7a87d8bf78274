"""What both faces of the server speak (the engine's HTTP app and the front-end processes): the contract's
errors, request bodies and multipart, request ids and the `x-mame-*` headers, the framed channel, the admin
token check and the HTTP protocol with a head timeout. Imports no torch: front-end processes stay small."""
