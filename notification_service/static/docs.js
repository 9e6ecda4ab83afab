// Served from the package, like Swagger UI itself: /docs works with no network.
// Relative URLs, so the page also works behind a proxy that adds a path prefix.
window.ui = SwaggerUIBundle({
  url: new URL("openapi.json", document.baseURI).href,
  dom_id: "#swagger-ui",
  deepLinking: true,
  tryItOutEnabled: false,
  persistAuthorization: false,
});
