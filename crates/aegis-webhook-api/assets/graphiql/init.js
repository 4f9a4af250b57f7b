// Starts GraphiQL against this server's /graphql. The API key goes in the
// headers editor (opened, with a placeholder); it stays in the browser tab.
(function () {
  var fetcher = GraphiQL.createFetcher({ url: "/graphql" });
  var root = ReactDOM.createRoot(document.getElementById("graphiql"));
  root.render(
    React.createElement(GraphiQL, {
      fetcher: fetcher,
      defaultHeaders: '{\n  "Authorization": "Bearer <your API key>"\n}',
      defaultEditorToolsVisibility: "headers",
    })
  );
})();
