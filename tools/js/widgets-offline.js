// Loaded just before the ipywidgets embed manager (embed-amd.js) on pages with widgets: see
// nb_ipywidgets_js in _config.yml; tools/vendor_js.sh copies it next to embed-amd.js.
// Two fixes so that the widgets work in the offline book, without console errors:
// 1. The font files of the CSS bundled in embed-amd.js are found relative to the RequireJS URL of its
//    module "@jupyter-widgets/html-manager/dist/libembed-amd" (by default a folder of that name next
//    to the page, which does not exist): map that module folder to this folder.
// 2. @jupyter-widgets/controls typesets widget labels with the MathJax 2 API,
//    MathJax.Hub.Queue(["Typeset", MathJax.Hub, element]); the book runs MathJax 3, so provide
//    that one call on top of MathJax 3's typesetPromise.
(function () {
  "use strict";
  var script = document.currentScript;
  if (script && script.src && window.requirejs) {
    var here = script.src.replace(/[?#].*$/, "").replace(/\/[^\/]*$/, "");
    window.requirejs.config({ paths: { "@jupyter-widgets/html-manager/dist": here } });
  }
  // MathJax is loaded with "defer", so it has run by DOMContentLoaded; the embed manager renders
  // the widgets later, on the window's load event.
  document.addEventListener("DOMContentLoaded", function () {
    var mj = window.MathJax;
    if (!mj || mj.Hub || !mj.startup) { return; }
    mj.Hub = {
      Queue: function (command) {
        var element = command && command[2];
        if (!element || !mj.typesetPromise) { return; }
        mj.startup.promise
          .then(function () { return mj.typesetPromise([element]); })
          .catch(function (err) { console.warn("MathJax could not typeset a widget label:", err); });
      }
    };
  });
})();
