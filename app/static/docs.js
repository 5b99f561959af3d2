"use strict";
// /docs: Swagger UI from this server's own files (app/static/swagger), on this server's
// OpenAPI document. Paths are relative, so a proxy that serves craftserve under a prefix works.
// No validator badge (it would load an image from elsewhere); the key given to Authorize
// stays in this tab's memory.
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  presets: [SwaggerUIBundle.presets.apis],
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
  persistAuthorization: false,
});
